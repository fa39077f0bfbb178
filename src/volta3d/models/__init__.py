"""volta3d.models"""
