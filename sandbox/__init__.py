"""sandbox: one node — images, templates, hardened containers, workspaces. No Ray here."""

__all__: list[str] = []
