"""validator: pre-deploy checks on the model files, before anything is loaded."""
