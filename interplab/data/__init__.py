"""interplab.data"""
