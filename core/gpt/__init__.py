"""The textbook: a GPT in pure PyTorch, read top to bottom by learners.

No files, no environment variables, no threads, no job status and no HTML here: that is the
machinery's job (`core.lab`).
"""
