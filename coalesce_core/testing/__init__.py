"""Test kits for backends and groups (the backend conformance suite lives here)."""
