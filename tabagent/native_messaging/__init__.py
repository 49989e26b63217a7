"""Chrome/Edge/Brave native messaging: framing, the host loop, relaying, manifest install.

The wire protocol is documented in ``PROTOCOL.md`` beside this file.
"""
