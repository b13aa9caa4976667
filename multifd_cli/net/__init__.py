"""Getting bytes between hosts: addresses, listen/connect, handshake, PSK and TLS, the ssh launcher, the control socket."""
