"""MTP heads: graft a MiMo-layout layer onto a checkpoint, re-train it on the model's own outputs, measure it."""
