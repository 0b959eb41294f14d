"""Where notices go: Slack (bot token or incoming webhook), a generic webhook, the console."""

from services.notifier.channels.base import Channel, DeliveryError, Notice, Receipt
from services.notifier.channels.console import ConsoleChannel
from services.notifier.channels.nop import NopChannel

__all__ = ["Channel", "ConsoleChannel", "DeliveryError", "NopChannel", "Notice", "Receipt"]
