"""Operations: what hangs off the daemon beside the request path (control, metrics, monitor, sd_notify, journal)."""
