"""notifier: tells people what happened, with the numbers and a link."""
