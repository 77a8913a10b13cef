"""The backend seam: hookspecs, volume handles and the default hooks that call them, the plugin manager
and the Volume facade the core calls, volume URLs, the generic rollback (Fig. 9), fault injection."""
