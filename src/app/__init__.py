"""The local web app (`python -m iclora.app`): data, training runs and inpainting in a browser.

The web layer is thin: each tab calls the same functions as the command lines (inpaint.py,
train.py, data.py here hold that glue, free of any web code, and are tested as such).
"""
