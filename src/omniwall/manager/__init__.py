"""Manager: store -> in-memory model -> compiler -> per-host desired states; tokens, audit, host status."""
