"""interplab.features"""
