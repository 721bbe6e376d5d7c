"""The GPT's and VQGAN's optimisation steps, schedules and loss curves. No Ray."""
