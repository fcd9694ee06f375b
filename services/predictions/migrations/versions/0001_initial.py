"""The predictions store's first schema: predictions, the webhook outbox, deployments, settings.

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

# Timestamps are UTC: `timestamp with time zone` on PostgreSQL, naive UTC text on SQLite.
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("version", sa.String(100), nullable=False),
        sa.Column("task", sa.String(16), nullable=False),
        sa.Column("served_model", sa.String(200), nullable=False),
        sa.Column("input", sa.JSON, nullable=False),
        sa.Column("effective_input", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("output", sa.JSON, nullable=True),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("logs", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("completed_at", TS, nullable=True),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("webhook", sa.Text, nullable=False),
        sa.Column("webhook_events_filter", sa.JSON, nullable=False),
        sa.Column("credentials", sa.JSON, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("worker", sa.String(200), nullable=False),
        sa.Column("lease_expires_at", TS, nullable=True),
    )
    op.create_index("ix_predictions_owner_created", "predictions", ["owner", "created_at", "id"])
    op.create_index("ix_predictions_created", "predictions", ["created_at", "id"])
    op.create_index("ix_predictions_runnable", "predictions", ["status", "lease_expires_at", "created_at"])
    # Counting an owner's waiting predictions (the queue bound) on every create.
    op.create_index("ix_predictions_waiting", "predictions", ["status", "owner"])
    op.create_index("ix_predictions_completed", "predictions", ["completed_at"])

    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("prediction_id", sa.String(64), nullable=False),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("next_attempt_at", TS, nullable=False),
        sa.Column("locked_by", sa.String(200), nullable=True),
        sa.Column("locked_until", TS, nullable=True),
        sa.Column("delivered_at", TS, nullable=True),
        sa.Column("abandoned_at", TS, nullable=True),
        sa.Column("last_error", sa.Text, nullable=False),
    )
    op.create_index("ix_webhook_deliveries_prediction", "webhook_deliveries", ["prediction_id"])
    op.create_index(
        "ix_webhook_deliveries_due", "webhook_deliveries", ["delivered_at", "abandoned_at", "next_attempt_at"]
    )

    op.create_table(
        "deployments",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("task", sa.String(16), nullable=False),
        sa.Column("version", sa.String(100), nullable=False),
        sa.Column("defaults", sa.JSON, nullable=False),
        sa.Column("input_schema", sa.JSON, nullable=True),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )

    op.create_table(
        "settings",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("settings")
    op.drop_table("deployments")
    op.drop_index("ix_webhook_deliveries_due", table_name="webhook_deliveries")
    op.drop_index("ix_webhook_deliveries_prediction", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    op.drop_index("ix_predictions_completed", table_name="predictions")
    op.drop_index("ix_predictions_waiting", table_name="predictions")
    op.drop_index("ix_predictions_runnable", table_name="predictions")
    op.drop_index("ix_predictions_created", table_name="predictions")
    op.drop_index("ix_predictions_owner_created", table_name="predictions")
    op.drop_table("predictions")
