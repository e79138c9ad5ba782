"""pneumo: chest X-rays to an ultra-light pneumonia classifier. No Prefect in here."""

__version__ = "0.1.0"
