"""arq workers: job functions and cron schedules, thin loops over domain functions."""
