"""Imported first by each adapter: an ImportError naming AdapterHub when the package ``adapters``
that Python imported is not guided-dropout's (see :func:`adapters._lazy.check_own_package`)."""

from ._lazy import check_own_package

check_own_package("adapters (guided-dropout)")
