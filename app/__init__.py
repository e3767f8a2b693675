"""The Gradio app (diffattn.app): every method in one web UI.

    diffattn app                        # http://127.0.0.1:7860, the testbed model
    python -m diffattn.app --port 0     # the same, on a free port

``core``: the tab registry (:class:`~diffattn.app.core.TabSpec`) and the Blocks builder;
``tabs/``: one module per method; ``serving``: the pipeline pool (one copy per concurrent
request), input limits, uploads and errors; ``launcher``: the command's arguments and server.
A frontend: it imports the library, the testbed and the CLI's model loader; nothing imports it.
"""
