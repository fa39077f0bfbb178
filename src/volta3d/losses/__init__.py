"""volta3d.losses"""
