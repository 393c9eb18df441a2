"""interplab.analysis"""
