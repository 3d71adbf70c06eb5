"""fastipirm: a fast trainer for IP-IRM and the masked contrastive objectives around it."""
__version__ = "0.1.0"
