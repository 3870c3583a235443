"""The relay: the model API's request and stream, generations, their buffers and readers."""
