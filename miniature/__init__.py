"""The trained miniature LLaDA-V: its task (scenes with known answers), training and evaluation."""
