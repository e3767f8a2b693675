"""Methods built on the engine: each a control (or a pipeline in diffattn.pipelines)."""
