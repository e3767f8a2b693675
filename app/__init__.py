"""The Gradio app (diffattn.app)."""
