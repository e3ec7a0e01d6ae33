"""funad.pipelines"""
