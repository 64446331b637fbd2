"""The IPython door: loading the extension, the kernel's foreground runner and interrupt
guard, output routing and provenance, and the magics."""
