"""Tables, engines and sessions; the schema's history lives in migrations/."""
