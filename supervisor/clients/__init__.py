"""The client side of the request path: the WebSocket front and the method router."""
