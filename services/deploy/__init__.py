"""Deployment: the Ray Serve application, its deployments, session-sticky routing, autoscaling policies,
and the single-process deployment of `serve --local`."""
