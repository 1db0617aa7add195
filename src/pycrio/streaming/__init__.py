"""The stream server for Exec, Attach and PortForward: SPDY/3.1 and WebSocket, remotecommand and port-forward."""
