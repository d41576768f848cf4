"""Optional integrations with other tools; the core package never imports them."""
