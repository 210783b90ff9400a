"""Reference device runtime (mirrored by the Android demo): front end on the device, fallback to the server."""
