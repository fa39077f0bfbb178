"""volta3d.engine"""
