"""Drop-in entry points for other code bases' attention calls (``rec2pm_kernels.compat.hstu``)."""
