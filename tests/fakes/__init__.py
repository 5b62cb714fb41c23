"""Local fakes of cloud REST APIs for tests (GCE, Azure Resource Manager)."""
