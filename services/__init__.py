"""The serving stack, a sub-package per role (see docs/architecture.md, "Where the code lives")."""
