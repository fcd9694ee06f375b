"""The predictions store's revisions, oldest first."""
