"""Integrations with the ecosystem: export to serving engines' formats, upload to the Hugging Face Hub."""
