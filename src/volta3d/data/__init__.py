"""volta3d.data"""
