"""Who may call and how much: API keys, tenants' quotas, rate limits, TLS."""
