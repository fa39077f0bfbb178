"""volta3d.evaluation"""
