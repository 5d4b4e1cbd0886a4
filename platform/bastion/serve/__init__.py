"""Ray Serve application: one engine deployment per (model, profile), the gateway ingress, config export."""
