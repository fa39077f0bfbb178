"""volta3d.downstream"""
