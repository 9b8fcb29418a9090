"""Fixtures and helpers of our own storage tests and benchmarks: loop-sysroot bootable images,
crash injection and hostile-input builders, containers-storage fixtures, EROFS samples, the storage
demo. Importable by tests/ and bench/, never by harness/ (the qualification product) or
bootc_unified/ (the product)."""
