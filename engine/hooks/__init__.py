"""diffusers hooks the engine attaches from outside the model: FIS, attention backend, compile."""
