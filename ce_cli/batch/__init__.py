"""`ce-check batch`: JSON-lines manifests of cases, run through the library; JUnit XML."""
