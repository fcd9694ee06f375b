"""The predictions service: asynchronous jobs with signed webhooks, stored in SQL."""
