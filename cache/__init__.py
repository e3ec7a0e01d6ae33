"""funad.cache"""
