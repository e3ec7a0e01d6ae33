"""funad.cli"""
