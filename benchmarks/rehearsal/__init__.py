"""The full-size rehearsal of the first run (`make rehearsal`): synthetic files in the real
layouts, a local Hugging Face cache, and per-stage time and memory of `starflow generate`."""
