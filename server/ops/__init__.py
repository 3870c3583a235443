"""Operations: logging, metrics, the monitor, process memory, systemd, state files."""
