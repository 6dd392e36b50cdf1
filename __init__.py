"""uac: a Kaggle-style training repo for audio classification (folders of clips -> k-fold ensemble -> submission)."""
__version__ = "0.2.0"
